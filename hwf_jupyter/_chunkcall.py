"""What runs on the daemon for one chunk of a chunked ``hub.map``.

It is sent by value (cloudpickle), not imported there: daemons need not
have ``hwf_jupyter`` installed.  So it imports only the standard library,
at call time.  Each call's exception is caught and kept (the other calls
of the chunk still run), pickled when it can be, else as its type and text.
"""


def run_chunk(fn, items, **kwargs):
    """``[(True, value) | (False, exception or None, type name, text, traceback)]``, one per item."""
    import traceback

    try:  # the worker unpickled this call with cloudpickle, so it has it
        import cloudpickle as pickler
    except ImportError:  # pragma: no cover
        import pickle as pickler

    out = []
    for args in items:
        try:
            out.append((True, fn(*args, **kwargs)))
        except Exception as exc:
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # not this frame
            text = "".join(traceback.format_exception(type(exc), exc, tb))
            try:
                pickler.dumps(exc)  # one that does not pickle would lose the whole chunk's values
                kept = exc
            except Exception:
                kept = None
            exc.__traceback__ = None
            out.append((False, kept, type(exc).__name__, str(exc)[:4096], text[-65536:]))
    return out
