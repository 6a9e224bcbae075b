"""The model zoo: architectures and their trained, cached weights."""
from bench.zoo.nets import ResNet, SmallCNN
from bench.zoo.train import accuracy, cache_key, load_model

__all__ = ["SmallCNN", "ResNet", "load_model", "cache_key", "accuracy"]
