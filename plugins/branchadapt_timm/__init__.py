"""timm backbones and classification losses: the branch recipe applied to image classification."""
