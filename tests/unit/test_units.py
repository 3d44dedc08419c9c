"""Sizes, durations and cpu lists as people type them (vmjobs.units)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmjobs.errors import VmjobsError
from vmjobs.units import (
    MAX_CPU_ID,
    format_clock,
    format_cpu_list,
    format_mib,
    parse_cpu_list,
    parse_duration,
    parse_size_mib,
)


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("64G", 64 * 1024),
        ("512M", 512),
        ("1.5G", 1536),
        ("1073741824", 1024),  # a bare number is bytes
        ("2T", 2 * 1024 * 1024),
        ("4096K", 4),
        ("64GiB", 64 * 1024),
        ("64gb", 64 * 1024),
        (" 512 M ", 512),
        ("1", 1),  # one byte still needs a whole MiB
        ("1048577", 2),  # rounded up, never down
    ],
)
def test_size_accepted(text: str, mib: int) -> None:
    assert parse_size_mib(text) == mib


@pytest.mark.parametrize("text", ["0", "0G", "0.0M", "-1", "-1G", "abc", "64Q", "", "G", "1.G",
                                  "1e9", "64G extra", "\n"])
def test_size_refused_with_one_line(text: str) -> None:
    with pytest.raises(VmjobsError) as info:
        parse_size_mib(text, "--mem")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("invalid --mem ")
    assert repr(text) in message


def test_size_zero_says_it_must_be_positive() -> None:
    with pytest.raises(VmjobsError, match="greater than zero"):
        parse_size_mib("0")


def test_format_mib() -> None:
    assert format_mib(512) == "512 MiB"
    assert format_mib(1024) == "1 GiB"
    assert format_mib(1536) == "1.5 GiB"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1h30m", 5400),
     ("1.5h", 5400), ("1h 30m", 5400), ("2H", 7200)],
)
def test_duration_accepted(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5", "abc", "5x", "m", "1.5.5", "5m-1"])
def test_duration_refused_with_one_line(text: str) -> None:
    with pytest.raises(VmjobsError) as info:
        parse_duration(text, "--timeout")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("invalid --timeout ")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1:30", 90),  # MM:SS
        ("0:01", 1),
        ("90:00", 5400),  # the leading field may exceed 59, as in Slurm
        ("1:30:00", 5400),  # HH:MM:SS
        ("01:02:03", 3723),
        ("48:00:00", 172800),
        ("2-12", 216000),  # D-HH
        ("2-12:30", 217800),  # D-HH:MM
        ("2-12:00:00", 216000),  # D-HH:MM:SS
        ("0-0:0:1", 1),
        ("1-0", 86400),
        ("0-23:59:59", 86399),
        (" 1:30:00 ", 5400),
    ],
)
def test_duration_slurm_forms(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "0:00", "0:0:0", "0-0", "0-00:00:00",  # zero: Slurm's "no limit", refused here
    "1:60", "1:60:00", "1:00:60", "1-24", "1-00:60", "1-00:00:60",  # a field out of range
    "1:2:3:4", "1-2-3", "-1:00", "1:", ":30", "1-", "-5", "1-2:", "1.5:00", "1h:30",
    "2-12h", "1:30m",
])
def test_duration_slurm_forms_refused(text: str) -> None:
    with pytest.raises(VmjobsError) as info:
        parse_duration(text, "--time-limit")
    message = str(info.value)
    assert "\n" not in message and message.startswith("invalid --time-limit ")


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0:00"), (5, "0:05"), (65, "1:05"), (3599.9, "59:59"), (3600, "1:00:00"),
    (3723, "1:02:03"), (86399, "23:59:59"), (86400, "1-00:00:00"), (93784, "1-02:03:04"),
    (400 * 86400, "400-00:00:00"),
])
def test_format_clock(seconds: float, text: str) -> None:
    assert format_clock(seconds) == text


@given(st.integers(min_value=1, max_value=366 * 86400))
def test_format_clock_reads_back(seconds: int) -> None:
    assert parse_duration(format_clock(seconds)) == seconds


def test_duration_bare_number_stays_seconds() -> None:
    # vmjob's own meaning since the start; sbatch would read minutes (docs say so)
    assert parse_duration("90") == 90


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3,^2,6", {0, 1, 3, 6}),
        ("0", {0}),
        ("0,16", {0, 16}),
        ("4-7", {4, 5, 6, 7}),
        ("0-7,^0-7", set()),
        (" 1 , 3 ", {1, 3}),
        ("^2,0-3", {0, 1, 3}),  # exclusions apply wherever they are written
        ("", set()),
    ],
)
def test_cpu_list_parsed(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == frozenset(cpus)


@pytest.mark.parametrize("text", ["a", "3-1", "-1", "1-", "1-2-3", "0,x", "^", "1.5"])
def test_cpu_list_refused_with_one_line(text: str) -> None:
    with pytest.raises(VmjobsError) as info:
        parse_cpu_list(text)
    assert "\n" not in str(info.value)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["0-1000000000", "8192", "0,8192", "^9000", "1-99999999999"])
def test_cpu_ids_beyond_linux_are_refused_before_any_range_is_built(text: str) -> None:
    """'0-1000000000' in a config used to build a billion-element set (MemoryError)."""
    with pytest.raises(VmjobsError) as info:
        parse_cpu_list(text)
    assert str(info.value).startswith(f"invalid cpu list {text!r}: cpu ")
    assert str(info.value).endswith(f" is beyond the largest cpu id Linux has ({MAX_CPU_ID})")


def test_the_largest_cpu_id_is_accepted() -> None:
    assert parse_cpu_list(f"{MAX_CPU_ID - 1}-{MAX_CPU_ID}") == {MAX_CPU_ID - 1, MAX_CPU_ID}


def test_a_huge_cpu_list_is_quoted_clipped() -> None:
    with pytest.raises(VmjobsError) as info:
        parse_cpu_list("x" * 10_000)
    assert len(str(info.value)) < 120


@pytest.mark.parametrize(
    ("cpus", "text"),
    [({0, 1, 2, 5}, "0-2,5"), ({0}, "0"), (set(), ""), ({3, 1, 2}, "1-3"),
     ({0, 2, 4}, "0,2,4"), ([7, 7, 8], "7-8"), ((16, 0), "0,16")],
)
def test_cpu_list_formatted(cpus, text: str) -> None:
    assert format_cpu_list(cpus) == text


cpu_sets = st.frozensets(st.integers(min_value=0, max_value=255), max_size=64)


@given(cpu_sets)
def test_cpu_list_set_round_trip(cpus: frozenset[int]) -> None:
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


@st.composite
def cpu_list_texts(draw: st.DrawFn) -> str:
    """Arbitrary valid libvirt cpu lists: singles, ranges and exclusions in any order."""
    items = []
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        low = draw(st.integers(min_value=0, max_value=64))
        high = draw(st.integers(min_value=low, max_value=low + 8))
        item = str(low) if low == high else f"{low}-{high}"
        items.append(("^" if draw(st.booleans()) else "") + item)
    return ",".join(items)


@given(cpu_list_texts())
def test_cpu_list_text_round_trip(text: str) -> None:
    canonical = format_cpu_list(parse_cpu_list(text))
    # The canonical form means the same cpus and is a fixed point of parse/format.
    assert parse_cpu_list(canonical) == parse_cpu_list(text)
    assert format_cpu_list(parse_cpu_list(canonical)) == canonical
    # ...and it is minimal: no exclusions, ascending, adjacent ranges merged.
    assert "^" not in canonical
    spans = [[int(x) for x in part.split("-")] for part in canonical.split(",") if part]
    for span in spans:
        assert len(span) == 1 or span[0] < span[1]
    for before, after in zip(spans, spans[1:], strict=False):
        assert after[0] > before[-1] + 1
