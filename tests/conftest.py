import os

import pytest

# Two cores on the CI machines: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def defect_split():
    """Textured parts with injected defects (scratches, spots, cut-and-paste), 96x96, seeded."""
    from gaikan.data.synthetic import make_defect_dataset

    return make_defect_dataset(40, 20, 20, size=96, seed=7)
