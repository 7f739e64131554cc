"""Model families; importing this package registers every model (timm's habit), then the weights the
project trained itself (:data:`dacnn.hub.TRAINED_TABLE`, written by ``dacnn publish``)."""

from dacnn.hub import read_trained_table, trained_cfg
from dacnn.models import airbench, convmixer, dacnn, lrunet, resnet, se_resnet, sharesnet, vgg  # noqa: F401
from dacnn.registry import register_pretrained

for _entry in read_trained_table():
    register_pretrained(_entry["model"], trained_cfg(_entry))
