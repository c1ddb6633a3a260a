"""stochprop: 3D segmentation training with stochastic backpropagation for convolutions."""

__version__ = "0.1.0"
