"""Progress of a quantization run: events to a bar, a JSON-lines file, and (inside a
worker pod) the QuantizationJob's status through ``kube``, imported only when needed so
the engine runs without the Kubernetes client."""
