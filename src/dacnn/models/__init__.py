"""Model families; importing this package registers every model (timm's habit)."""

from dacnn.models import convmixer, dacnn, lrunet, resnet, se_resnet, sharesnet, vgg  # noqa: F401
