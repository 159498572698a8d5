"""Models from elsewhere in and out: flax nnx, the seed's Keras notation, Keras 3, ONNX, the drop-in layer.

Each module imports its framework when it is itself imported, never before: ``import jfactor``
loads none of flax's modules here, nor keras or onnx (extras ``jfactor[keras]``, ``jfactor[onnx]``).
"""
