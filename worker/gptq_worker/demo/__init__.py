"""The offline quickstart: a small model trained on standard-library source, quantized,
validated, scored and served, with nothing downloaded."""
