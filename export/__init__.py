"""Training and export of the Keras image/text/fusion models (needs the ``export`` extra).

Importing this package does not import TensorFlow; its submodules ``models``, ``train`` and
``convert`` do.
"""
