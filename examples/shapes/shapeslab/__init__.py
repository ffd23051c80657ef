"""A researcher's own project, as it would sit in its own folder: a model and a dataset factory that the
harness knows nothing about, named from the spec (``shapeslab.models:small_cnn``)."""
