"""Hardware profiles: one JSON file per device under ``hardware_profiles/``, every number with
its source."""
from simcost.hardware.profile import HardwareProfile, list_profiles, load_profile

__all__ = ["HardwareProfile", "list_profiles", "load_profile"]
