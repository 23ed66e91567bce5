"""Dataset readers: every competition layout becomes a stream of :class:`kseg.io.sample.Sample`."""
