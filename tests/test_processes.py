"""`processes`: what the processes of a multi-process run must agree on. The 2-process run that
disagrees is in tests/test_multihost.py; here the pure parts, and the collectives on one
process."""

import re

from mrcnn_jax.programs import processes

FIRST = {
    "config": {"train": {"num_steps": 6, "lr": 0.1}, "data": {"data_dir": "/data"}},
    "workdir": "/shared/run",
    "token": "abc",
}


def test_the_collectives_return_this_process_s_text_on_one_process():
    assert processes.broadcast_text("héllo {}") == "héllo {}"
    assert processes.gather_texts("") == [""]
    assert processes.gather_texts("a; b") == ["a; b"]


def test_config_differences_name_each_field_with_both_values():
    mine = {"train": {"num_steps": 8, "lr": 0.1, "new": [1, 2]}, "data": {}}
    assert processes.config_differences(FIRST["config"], mine) == [
        'data.data_dir=no such field (process 0: "/data")',
        "train.new=[1, 2] (process 0: no such field)",
        "train.num_steps=8 (process 0: 6)",
    ]
    assert processes.config_differences(FIRST["config"], FIRST["config"]) == []


def test_agreement_problems():
    same = dict(FIRST)
    assert processes.agreement_problems(FIRST, same, token_seen="abc") == []
    # Another host's local disk: the same path, not process 0's file (none, or an old run's).
    for seen in (None, "old"):
        (problem,) = processes.agreement_problems(FIRST, same, token_seen=seen)
        assert problem.startswith(
            f"it does not see the file process 0 wrote into /shared/run ({processes.TOKEN_FILE})"
        )
    other = {**FIRST, "workdir": "/local/run", "config": {"train": {"num_steps": 6}}}
    assert processes.agreement_problems(FIRST, other, token_seen=None) == [
        "its config differs from process 0's: data.data_dir=no such field (process 0: "
        '"/data"), train.lr=no such field (process 0: 0.1)',
        "its workdir /local/run is not process 0's /shared/run",
    ]
    many = {**FIRST, "config": {f"f{i:02d}": i for i in range(12)}}
    (problem,) = processes.agreement_problems({**FIRST, "config": {}}, many, token_seen="abc")
    assert problem.endswith("f07=7 (process 0: no such field) and 4 more")
    assert len(re.findall(r"\(process 0", problem)) == 8


def test_one_process_is_not_checked(tmp_path):
    import ml_collections

    processes.check_processes_agree(ml_collections.ConfigDict({"a": 1}), tmp_path)
    assert list(tmp_path.iterdir()) == []  # no token written
