"""``xdist_group`` marks that work under pytest 9 (a plugin ``conftest.py`` registers).

Under ``--dist loadgroup`` (``make test``), pytest-xdist keeps a group on one worker by naming the
group in each test's node id (``id@group``), so a module fixture the group shares is built once.
xdist 3.8 sets ``item._nodeid``, which pytest 9 no longer reads, so the marks did nothing; this hook
writes the id pytest does read. ``tests/test_xdist_groups.py`` checks that a group's fixture is
built once across two workers.
"""

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers only
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")
