"""One module per model family; each defines `FAMILY = ModelFamily(...)` (common/model/family.py).

`common/model/architectures.py` imports every module here and looks families up by the HF
`architectures` names they declare: a new family is a new module here (and its tests).
"""
