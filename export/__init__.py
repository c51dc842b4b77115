"""Training and export of the Keras image/text/fusion models (needs the ``export`` extra).

Importing this package does not import TensorFlow; its submodules ``models``, ``train`` and
``convert`` do.
"""

# The export defaults, in one place: read by the CLI (without importing TensorFlow) and the modules.
DEFAULT_SAMPLES = 5000  # training pairs
DEFAULT_EPOCHS = 3
DEFAULT_OPSET = 17  # ONNX opset tf2onnx converts to
