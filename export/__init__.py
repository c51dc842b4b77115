"""Training and export of the Keras image/text/fusion models (needs the ``export`` extra).

Importing this package does not import TensorFlow; its submodules ``models``, ``train`` and
``convert`` do.
"""

# The export defaults, in one place: read by the CLI (without importing TensorFlow) and the modules.
DEFAULT_SAMPLES = 5000  # training pairs
# 4, not 3: at 3 the fused accuracy straddled 0.99 from seed to seed, image shapes being the last thing learnt
# (0.941-0.993 with the masked text encoder, 0.956-0.995 with the unmasked one; 0.998-1.0 at 4)
DEFAULT_EPOCHS = 4
DEFAULT_OPSET = 17  # ONNX opset tf2onnx converts to
