"""The data sets the project draws itself, written to disk in the layout a loader in
:mod:`kd_trainer.data` reads: SynthPEDES (:mod:`.pedes`, the CUHK-PEDES layout), SynthShapes
(:mod:`.shapes`, ImageFolder) and SynthDet (:mod:`.detection`, COCO-style). Each is seeded and
byte-identical between runs, and a folder is reused only when the same arguments wrote it
(:mod:`.generated`). Import the module you need; nothing is imported here.
"""
