"""The Slurm side of Shifter, shaped like pyxis: one module per SPANK context.

The C shim (``spank/shifter_spank.c``) starts Python only where Shifter is used and hands
every callback it forwards to :mod:`.dispatch`, which sends it on by context:

- :mod:`.submit`: ``srun``, ``sbatch``, ``salloc`` (local and allocator): check the options,
  resolve the image, export the request to the job (runs as the user);
- :mod:`.stepd`: slurmstepd (remote): find or make the root a step's tasks enter, enter it
  in each task, remove a step's own root at its end (root, then the user);
- :mod:`.jobscript`: the job prolog and epilog (root, once per node and job);
- :mod:`.container`: a request checked again as root and turned into a plan (the prolog's
  and the steps' one path);
- :mod:`.names`: the ``SHIFTER_*`` variables and option numbers, defined once;
- :mod:`.api`: the SPANK handle and Slurm's log (everything that touches cffi's ``lib``);
- :mod:`.state`: what this process has learnt (plugin arguments, configuration, options).

Where each callback runs (observed on Slurm 22.05):

- ``srun`` (local): init → options → init_post_opt → exit
- ``sbatch``/``salloc`` (allocator): init → options → init_post_opt → exit
- ``slurmstepd`` (remote, every step): init → options (twice) → init_post_opt →
  user_init → per task task_init_privileged → task_init; exit
- prolog/epilog (job_script): job_prolog or job_epilog alone (the epilog in every job)

These modules are on the start-up path of every Shifter srun and job step: they import
only what they need, when they need it, and never start threads (slurmstepd forks tasks
while the interpreter lives).
"""
