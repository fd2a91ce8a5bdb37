"""Command-line converter: PyTorch Sequencer2D checkpoints -> Keras files.

    python -m weights_conversion CHECKPOINT --variant sequencer2d_s --output OUT.weights.h5
"""
