"""Short CI version of the fuzzing campaign (fuzz/README.rst): every target of
``fuzz/targets.py`` on its seed corpus, on mutations of the seeds and on arbitrary bytes, a
bounded number of examples each (hypothesis).  A failure here is a crash or a wrong answer
in a decoder or in ``Server.receive``; the long run is ``fuzz/campaign.py``."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import seeds, targets

SEEDS = seeds.seeds()
NAMES = sorted(targets.TARGETS)
EXAMPLES = {"server": 100, "statefile": 80, "group": 100, "config": 100}


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """The decoders log every rejected input: silence them for the duration of a test."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def test_every_decoder_has_a_target_and_seeds() -> None:
    assert set(NAMES) >= {"wire", "ctr", "messages", "checkpoint", "disklog", "capture",
                          "config", "statefile", "server", "group"}  # fmt: skip
    assert all(SEEDS[name] for name in NAMES), [n for n in NAMES if not SEEDS[n]]


@pytest.mark.parametrize("name", NAMES)
def test_seeds(name: str) -> None:
    for seed in SEEDS[name]:
        targets.TARGETS[name](seed)


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    buf = bytearray(draw(st.sampled_from(SEEDS[name])))
    for _ in range(draw(st.integers(1, 6))):
        how = draw(st.integers(0, 3))
        at = draw(st.integers(0, max(len(buf) - 1, 0)))
        if how == 0 and buf:
            buf[at] = draw(st.integers(0, 255))
        elif how == 1:
            del buf[at:]
        elif how == 2:
            buf[at:at] = draw(st.binary(max_size=16))
        elif buf:
            buf[at : at + 4] = draw(st.sampled_from([b"\0\0\0\0", b"\xff\xff\xff\xff",
                                                     b"\x01\0\0\0", b"\0\x10\0\0"]))  # fmt: skip
    return bytes(buf)


def _inputs(name: str) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(name), st.binary(max_size=600))


@pytest.mark.parametrize("name", NAMES)
def test_fuzz(name: str) -> None:
    check = targets.TARGETS[name]

    @settings(
        max_examples=EXAMPLES.get(name, 250),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(_inputs(name))
    def run(data: bytes) -> None:
        check(data)

    run()


def test_server_target_catches_a_wrong_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-to-end target is not vacuous: a server that reports marked regions clean, or
    answers a malformed request with success, fails it."""
    from ulogd.state import regionlog

    monkeypatch.setattr(regionlog.RegionLog, "is_clean", lambda self, r: (0, 1))
    with pytest.raises(AssertionError, match="clean"):
        targets.check_server(SEEDS["server"][0])
