"""Model families; importing this package registers every model (timm's habit)."""

from dacnn.models import dacnn, resnet, vgg  # noqa: F401
