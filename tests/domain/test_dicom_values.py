"""A value set from text either fits its VR and survives a write and a read, or is refused:
never a data set pydicom would write with a value its VR forbids."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset

from capacitor_trio.domain.dicom_values import destination_vr, make_element, value_text
from tests.helpers.datasets import make_dataset, to_part10_bytes

# one attribute per VR an add_or_update may set
TAGS = [
    0x00080060,  # CS
    0x00081010,  # SH
    0x00081030,  # LO
    0x00100010,  # PN
    0x00080020,  # DA
    0x00080030,  # TM
    0x0008002A,  # DT
    0x00200013,  # IS
    0x00180050,  # DS
    0x00280010,  # US
    0x00200052,  # UI
    0x00204000,  # LT
    0x00101010,  # AS
    0x00400241,  # AE
    0x0040A160,  # UT
    0x00181151,  # IS (X-Ray Tube Current)
    0x00189327,  # FD
]

_TEXT = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="0123456789.-+ :^=\\_ABCDEFabcé", max_size=40),
    st.from_regex(r"(19|20)\d\d(0[1-9]|1[0-2])(0[1-9]|[12]\d)", fullmatch=True),
    st.from_regex(r"[0-9]{1,5}(\\[0-9]{1,5})?", fullmatch=True),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(TAGS), _TEXT, st.sampled_from([None, "ISO_IR 100", "ISO_IR 192"]))
def test_a_value_fits_or_is_refused(tag: int, text: str, charset: str | None) -> None:
    ds = make_dataset(rows=2, columns=2)
    if charset:
        ds.SpecificCharacterSet = charset
    vr = destination_vr(tag)
    try:
        element = make_element(tag, vr, text, ds)
    except ValueError:
        return
    ds[tag] = element
    back = dcmread(io.BytesIO(to_part10_bytes(ds)))
    assert _normal(value_text(back[tag])) == _normal(value_text(element))


def _normal(text: str) -> list[str]:
    """Values with the padding and the spaces a reader may drop (leading ones in numbers)."""
    return [v.strip(" \0") for v in text.split("\\")]


def test_values_that_fit() -> None:
    ds = Dataset()
    assert value_text(make_element(0x00280010, "US", "512", ds)) == "512"
    assert value_text(make_element(0x00080008, "CS", "ORIGINAL\\PRIMARY", ds)) == "ORIGINAL\\PRIMARY"
    assert value_text(make_element(0x00080020, "DA", "", ds)) == ""
    assert make_element(0x00280010, "US", "", ds).value is None
