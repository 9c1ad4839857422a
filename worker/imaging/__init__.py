"""Imaging: from a file's bytes to the model's input.

Header checks before decoding, DICOM reading (transfer syntaxes, LUTs, photometric
interpretation, the faster pixel decoders, JPEG 2000 levels), the patient/exam/view identity
of an image, and the one preprocessing path that trainer and worker share (its settings and
version travel in the model's metadata). The geometry that maps a model's attention back onto
the original picture and the drawing of heatmaps live here too. Imaging imports no other wing:
the trainer uses it without the database.
"""
