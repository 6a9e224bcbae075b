"""The model zoo: architectures and their trained, cached weights."""
from bench.zoo.nets import VGG, ResNet, SmallCNN, ViT
from bench.zoo.sources import from_checkpoint, timm_model, torchvision_model
from bench.zoo.train import accuracy, cache_key, load_model

__all__ = ["SmallCNN", "ResNet", "VGG", "ViT", "torchvision_model", "timm_model", "from_checkpoint",
           "load_model", "cache_key", "accuracy"]
