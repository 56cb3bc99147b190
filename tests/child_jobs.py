"""Jobs for tests/test_child.py: what a child can do to the protocol (answer, report, fail, die)."""

import os


def echo(payload, channel):
    for i in range(payload["events"]):
        channel.event(step=i)
    return {"echo": payload["value"]}


def raises(payload, channel):
    raise RuntimeError("injected: the job failed")


def dies_after_saving(payload, channel):
    channel.partial({"done": ["first stage"]})
    print("last words", flush=True)
    os._exit(9)


def whoami(payload, channel):
    channel.event(step=0)
    return {"pid": os.getpid(), "ppid": os.getppid()}


def segfaults(payload, channel):
    import signal

    channel.partial({"done": ["before the crash"]})
    os.kill(os.getpid(), signal.SIGSEGV)


def dies_holding_a_temporary_file(payload, channel):
    """Writes a temporary file where jobs keep theirs, says where, and dies without removing it."""
    import tempfile

    directory = tempfile.mkdtemp(prefix="spill-", dir=__import__("harness.child").child.scratch())
    with open(os.path.join(directory, "logits.npy"), "wb") as f:
        f.write(b"\0" * 1024)
    channel.event(directory=directory)
    os.kill(os.getpid(), 9)


def traces_a_tf_function(payload, channel):
    """Traces a tf.function with TensorFlow's temporary directory at payload["tmp"]: autograph writes its
    generated code there and registers an exit function to remove it, as in every stablehlo stage."""
    import tempfile

    import tensorflow as tf

    tempfile.tempdir = payload["tmp"]
    value = tf.function(lambda x: x * 2 + 1)(tf.constant(1.0))
    return {"value": float(value), "written": sorted(os.listdir(payload["tmp"]))}
