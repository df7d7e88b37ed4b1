"""tw/comm/ipc.py's overlap rules for arrays passed to a peer transport (no GPU needed: the buffer's
layout is set by hand, arrays are stand-ins with a pointer and a size)."""
from types import SimpleNamespace

import pytest

from tw.comm.ipc import ALIGN, SharedBuffer


def _buffer():
    buf = object.__new__(SharedBuffer)   # the layout only: no device memory, no peers
    buf.label, buf.base, buf.sizes = "P2P", 1 << 20, {"staging": 4096, "out": 4096, "flags": 64}
    buf.offsets, total = {}, 0
    for name, size in buf.sizes.items():
        buf.offsets[name] = total
        total += -(-size // ALIGN) * ALIGN
    buf.size = total
    return buf


def _array(ptr, nbytes):
    return SimpleNamespace(data=SimpleNamespace(ptr=ptr), nbytes=nbytes)


NAMES, ACCESS = ("staging", "out"), {"staging": "staging", "out": "output"}


def test_an_array_at_a_region_start_is_that_region():
    buf = _buffer()
    assert buf.region_of("out", _array(buf.base + buf.offsets["out"], 4096), NAMES, ACCESS) == "out"
    assert buf.region_of("out", _array(buf.base, 1024), NAMES, ACCESS) == "staging"


def test_an_array_outside_the_buffer_is_private():
    buf = _buffer()
    assert buf.region_of("out", _array(buf.base + buf.size, 4096), NAMES, ACCESS) is None
    assert buf.region_of("out", _array(buf.base - 4096, 4096), NAMES, ACCESS) is None


def test_inside_a_region_but_not_at_its_start_names_the_accessor():
    buf = _buffer()
    with pytest.raises(ValueError, match=r"out overlaps the registered out buffer .* comm\.output\(n\)"):
        buf.region_of("out", _array(buf.base + buf.offsets["out"] + 16, 64), NAMES, ACCESS)


def test_the_internal_regions_are_refused_and_no_region_is_accepted_when_none_is_allowed():
    buf = _buffer()
    with pytest.raises(ValueError, match="residual overlaps the P2P transport's internal buffers"):
        buf.region_of("residual", _array(buf.base + buf.offsets["flags"], 16), NAMES, ACCESS)
    with pytest.raises(ValueError, match="residual overlaps the P2P transport's internal buffers"):
        buf.region_of("residual", _array(buf.base, 4096), (), ACCESS)
