"""The ground floor of cbtm: what every other package stands on, importing nothing of ours.

- `ground.errors`: the exceptions a user can act on (`UserInputError`, `IncompatibleRunError`);
- `ground.files`: atomic writes, cbtm's own temporaries, content hashing;
- `ground.rundir`: the run-directory contract (`RunDir` owns every path, `Manifest` is `manifest.json`);
- `ground.fields`: type and range checks for the stage config dataclasses;
- `ground.arrays`: `.npy` reads that are safe from many threads;
- `ground.device`: device and precision resolution;
- `ground.progress`, `ground.plots`: progress bars and figures;
- `ground.faults`: named fault-injection points (a real SIGKILL at a chosen moment, for the kill tests).
"""
