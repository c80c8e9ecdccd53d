"""The HWF daemon: runs tasks assigned by the hub and reports how they went."""
