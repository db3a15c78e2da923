"""`varformer.ops.backends()` prints as a table and stays the dict it was."""
import varformer.ops as vo


def test_backends_prints_a_table_and_is_a_dict():
    info = vo.backends()
    assert isinstance(info, dict) and info["reference"] == {"available": True,
                                                             "reason": "plain PyTorch"}
    text = str(info)
    lines = text.splitlines()
    assert lines[0].split() == ["backend", "available", "reason"]
    assert set(lines[1]) <= {"-", " "}
    names = [ln.split()[0] for ln in lines[2:]]
    assert names == list(info)
    for ln, (name, v) in zip(lines[2:], info.items()):
        if name != "requested":
            assert ln.split()[1] == ("yes" if v["available"] else "no")
            assert v["reason"] in ln
    assert repr(info) == text
