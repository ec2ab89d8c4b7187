"""What runs beside the served model: the model server (TF Serving's stand-in), the gateway, the
sync from the store, the wire formats they share (``protocol``), and the stack that starts them.
The store itself is ``storage``; the client for other services is ``clients/python``."""
