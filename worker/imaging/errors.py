"""The one error of the imaging wing: a file that cannot become a model input."""


class ImageError(ValueError):
    """A file that cannot become a model input; the message is the quarantine reason."""
