"""The network lab: RLVR against SFT on a whole pretrained transformer (``gatesim lab``)."""
