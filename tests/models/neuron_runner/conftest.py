"""The fake Neuron host's fixtures (tests/fakes/neuron_host.py) for the tests here."""

from tests.fakes.neuron_host import cpu_host, fake_sdk, neuron_host, no_fake_survives_its_test  # noqa: F401
