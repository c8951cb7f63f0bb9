"""The ICA trainers: the `ica_*` config fields, the mixin and controller every trainer shares, and the SFT, DPO and
CPO/SimPO config/trainer pairs."""
