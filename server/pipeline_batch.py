"""A pipeline's work for many calls in one thread hop: decoding, both encoders and fusion, batch by batch.

A call asks for a :class:`Job`: images to decode and encode, token rows to encode, the features the
embedding cache already had, and the (image, text) pairs to fuse. Concurrent calls' jobs meet in one
queue, a :class:`PipelineBatcher` (the dynamic batcher's policy: a lone caller never waits for a
batch, a crowd is batched). Each batch is one run of :class:`PipelineRun` in a worker thread: every
image decoded, each model run once over all the jobs' rows (in pieces of its ``max_batch_size``),
and each job given its own rows back. A call then costs one queue, one future and one thread hop,
not one per model.

Each model still counts the pipeline's runs as its own (statistics, metrics, ``batch <model>``
trace spans), and a call's images that fail to decode are answered per image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusionserve.errors import FusionServeError
from fusionserve.preprocess import ImagePreprocessing, decode_image
from fusionserve.server.batcher import DynamicBatcher, RunFn, _Work
from fusionserve.server.limits import Limits, check_image_header
from fusionserve.server.pipeline_config import Step


@dataclass
class Job:
    """One call's work: what to compute, what the cache had, and which pairs to fuse.

    Images and texts are keyed by the call's own indices; ``pairs`` are (image index, text index).
    """

    images: dict[int, bytes]  # encoded images to decode and encode
    texts: dict[int, np.ndarray]  # token rows (full length) to encode
    image_features: dict[int, np.ndarray] = field(default_factory=dict)  # known already (the cache)
    text_features: dict[int, np.ndarray] = field(default_factory=dict)
    pairs: Sequence[tuple[int, int]] = ()

    @property
    def size(self) -> int:
        """The most rows this job adds to any one model's batch."""
        return max(len(self.images), len(self.texts), len(self.pairs))

    def uses(self, role: str) -> bool:
        """Whether this job has rows for the stage of ``role`` ("image", "text" or "fusion")."""
        return bool(self.images if role == "image" else self.texts if role == "text" else self.pairs)


@dataclass
class Done:
    """A job's answer: the features it computed, its images that failed, and a fused row per pair.

    A pair whose image failed (or was not known) has no fused row.
    """

    image_features: dict[int, np.ndarray]
    image_errors: dict[int, FusionServeError]
    text_features: dict[int, np.ndarray]
    fused: dict[int, np.ndarray]  # position in ``pairs`` → the fusion model's row


@dataclass(frozen=True)
class Stage:
    """One model as a pipeline batch runs it: its session's run, and its own batcher, which counts the run."""

    role: str  # "image", "text" or "fusion"
    step: Step
    run: RunFn
    batcher: DynamicBatcher

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The step's output for the rows of ``inputs``, in pieces of at most the model's ``max_batch_size``."""
        rows = len(next(iter(inputs.values())))
        most = self.batcher.max_batch_size
        if rows <= most:
            return self.run(inputs)[self.step.output]
        return np.concatenate([self.run({k: v[start : start + most] for k, v in inputs.items()})[self.step.output]
                               for start in range(0, rows, most)])  # fmt: skip


@dataclass
class Ran:
    """A batch's answers, one per job, and when each part of it ran (for statistics and spans)."""

    done: list[Done]
    decoded: tuple[float, float] | None = None  # (started, seconds) of decoding
    images: int = 0  # images decoded (refused ones not counted; their checks are in the time)
    runs: list[tuple[Stage, float, float, int]] = field(default_factory=list)  # (stage, started, seconds, rows)


class PipelineRun:
    """Runs a batch of jobs: decode, image encoder, text encoder, fusion, each once for all the jobs."""

    def __init__(self, image: Stage, text: Stage, fusion: Stage, preprocessing: ImagePreprocessing, limits: Limits,
                 cut: Callable[[np.ndarray], np.ndarray] | None = None) -> None:  # fmt: skip
        """``cut``: what the text encoder's rows go through first (cut to the batch's longest caption), if anything."""
        self.image, self.text, self.fusion = image, text, fusion
        self.preprocessing, self.limits, self.cut = preprocessing, limits, cut

    def __call__(self, jobs: list[Job]) -> Ran:
        """Every job's answer (features, bad images, fused rows), each model run once for all of them."""
        ran = Ran([Done({}, {}, {}, {}) for _ in jobs])
        self._images(jobs, ran)
        self._texts(jobs, ran)
        self._fuse(jobs, ran)
        return ran

    def _timed(self, stage: Stage, inputs: dict[str, np.ndarray], ran: Ran) -> np.ndarray:
        started = time.perf_counter()
        out = stage(inputs)
        ran.runs.append((stage, started, time.perf_counter() - started, len(out)))
        return out

    def _images(self, jobs: list[Job], ran: Ran) -> None:
        wanted = [(j, i, data) for j, job in enumerate(jobs) for i, data in job.images.items()]
        if not wanted:
            return
        started = time.perf_counter()
        p = self.preprocessing
        sized = np.empty((len(wanted), p.height, p.width, 3), np.uint8)
        decoded: list[tuple[int, int]] = []
        for j, i, data in wanted:
            try:
                check_image_header(data, self.limits)
                sized[len(decoded)] = p.resize(decode_image(data))
                decoded.append((j, i))
            except FusionServeError as e:
                ran.done[j].image_errors[i] = e
        pixels = p.scale_pixels(sized[: len(decoded)])  # the whole batch at once (see scale_pixels)
        ran.decoded, ran.images = (started, time.perf_counter() - started), len(decoded)
        if decoded:
            rows = self._timed(self.image, {self.image.step.inputs[0]: pixels}, ran)
            for (j, i), row in zip(decoded, rows, strict=True):
                ran.done[j].image_features[i] = row

    def _texts(self, jobs: list[Job], ran: Ran) -> None:
        wanted = [(j, i) for j, job in enumerate(jobs) for i in job.texts]
        if not wanted:
            return
        tokens = np.stack([jobs[j].texts[i] for j, i in wanted])
        if self.cut is not None:
            tokens = self.cut(tokens)
        rows = self._timed(self.text, {self.text.step.inputs[0]: tokens}, ran)
        for (j, i), row in zip(wanted, rows, strict=True):
            ran.done[j].text_features[i] = row

    def _fuse(self, jobs: list[Job], ran: Ran) -> None:
        wanted, images, texts = [], [], []
        for j, (job, done) in enumerate(zip(jobs, ran.done, strict=True)):
            for position, (i, t) in enumerate(job.pairs):
                image = done.image_features.get(i, job.image_features.get(i))
                text = done.text_features.get(t, job.text_features.get(t))
                if image is not None and text is not None:
                    wanted.append((j, position))
                    images.append(image)
                    texts.append(text)
        if not wanted:
            return
        image_input, text_input = self.fusion.step.inputs
        rows = self._timed(self.fusion, {image_input: np.stack(images), text_input: np.stack(texts)}, ran)
        for (j, position), row in zip(wanted, rows, strict=True):
            ran.done[j].fused[position] = row


class PipelineBatcher(DynamicBatcher):
    """Jobs of concurrent calls, batched and run by one :class:`PipelineRun` per batch (see the module docstring)."""

    def __init__(self, name: str, run: PipelineRun, executor: Any, *, version: int = 0, **policy: Any) -> None:
        # Never on the event loop, not even a lone call's: while a batch runs, the loop must take up the
        # calls that arrive meanwhile. A batch run on the loop hid them from the pipeline, and each in
        # turn then found it empty and ran alone: a crowd served one call at a time.
        super().__init__(name, run, executor, version=version, inline_below_s=0.0,  # type: ignore[arg-type]
                         inline_idle_below_s=0.0, **policy)  # fmt: skip

    async def run_job(self, job: Job, *, deadline: float | None = None) -> Done:
        """Queue one call's job (``job.size`` at least 1, at most ``max_batch_size``) and await its answer.

        Raises:
            DeadlineExceededError: the deadline passed before the job ran.
            ModelNotReadyError: the pipeline is closing.
        """
        done: Done = await self._submit(job, job.size, deadline, False)
        return done

    def _merged(self, live: list[_Work]) -> list[Job]:
        return [work.inputs for work in live]

    def _answers(self, outputs: Ran, live: list[_Work]) -> list[Done]:
        return outputs.done

    def _ran(self, outputs: Ran, live: list[_Work]) -> None:
        """The pipeline counts its decoding, and each model its part of the batch as one of its own runs."""
        if outputs.decoded is not None and outputs.images and self.stats.on_decode:  # a time an image, never x/0
            self.stats.on_decode(outputs.images, outputs.decoded[1])
        for stage, started, seconds, rows in outputs.runs:
            stage.batcher.record(rows, seconds, [started - w.enqueued for w in live if w.inputs.uses(stage.role)])

    def _traced(self, work: _Work, outputs: Ran, started: float, run_s: float, rows: int, calls: int,
                leader: Any) -> Any:  # fmt: skip
        """The pipeline's queue and batch spans, then decoding's and each model's (linked to the batch's first)."""
        assert work.call is not None
        leaders = leader or {}
        leaders[self] = work.call.batched(self, work.enqueued, started, run_s, rows, calls, leaders.get(self))
        job: Job = work.inputs
        if outputs.decoded is not None and job.images:
            decode_started, seconds = outputs.decoded
            work.call.step("decode", decode_started, ended=decode_started + seconds,
                           **{"fusionserve.images": len(job.images)})  # fmt: skip
        for stage, stage_started, seconds, stage_rows in outputs.runs:
            if job.uses(stage.role):
                leaders[stage] = work.call.ran(stage.batcher, stage_started, seconds, stage_rows, calls,
                                               leaders.get(stage))  # fmt: skip
        return leaders
