"""Pure, synchronous codecs: no I/O, no Trio, bad input raises a typed error."""
