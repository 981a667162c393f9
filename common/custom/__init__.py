"""Custom classes trained on a user's photos: heads on a base model's features (``heads``), the
datasets they are trained on (``dataset``), their settings, and the training itself (``train``)."""
