"""Stages read Python code (cache keys, the stdlib task) while Prefect's event-loop thread runs
beside them. On CPython 3.11 building `ast` objects in two threads at once can fail
(gh-106905: "SystemError: AST constructor recursion depth mismatch"); it failed a CI run. These
tests make the race happen on purpose and check that our code is not exposed to it."""

from __future__ import annotations

import ast
import contextlib
import gc
import sys
import threading
import time
from collections.abc import Iterator

from lm.data.labelled import stdlib_definitions
from lm.pipeline.workspace import _module_code, code_digest, module_closure
from lm.stages import STAGES


def _yield(phase: str, info: dict) -> None:
    time.sleep(0)  # lets another thread run, as a finalizer that closes a socket or a file does


@contextlib.contextmanager
def another_thread_parsing() -> Iterator[None]:
    """A thread parsing small snippets, as `inspect.signature` of a builtin does, and frequent
    collections that hand it the interpreter while this thread is in the middle of its own parse
    (a collection in the middle of building a syntax tree, whose finalizers release the GIL)."""
    stop = threading.Event()

    def parse_signatures() -> None:
        while not stop.is_set():
            try:
                ast.parse("def f(self, /, *args, **kwargs): pass")
            except SystemError:  # its own parse may be the one that is spoiled
                pass

    thread = threading.Thread(target=parse_signatures, daemon=True)
    interval, threshold = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-5)
    gc.set_threshold(50)
    gc.callbacks.append(_yield)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        gc.callbacks.remove(_yield)
        sys.setswitchinterval(interval)
        gc.set_threshold(*threshold)


def _big_parse_fails() -> bool:
    try:
        ast.parse(open(ast.__file__, encoding="utf-8").read())
    except SystemError:
        return True
    return False


def test_cache_keys_are_computed_while_another_thread_parses():
    quiet = {s.name: code_digest(s) for s in STAGES}
    closures = {s.name: module_closure(s.code) for s in STAGES}
    with another_thread_parsing():
        # The harness does provoke the race wherever the interpreter has it.
        race = sum(_big_parse_fails() for _ in range(10))
        for _ in range(3):
            _module_code.cache_clear()  # read every module again, not from the cache
            assert {s.name: code_digest(s) for s in STAGES} == quiet
            assert {s.name: module_closure(s.code) for s in STAGES} == closures
    if sys.version_info[:2] == (3, 11):
        assert race > 0, "the harness did not provoke the race it exists for"


def test_the_stdlib_is_read_while_another_thread_parses():
    quiet = stdlib_definitions({"json", "email"})
    with another_thread_parsing():
        for _ in range(3):
            assert stdlib_definitions({"json", "email"}) == quiet
    assert len(quiet) > 50
