"""Turns a config and a cluster into processes (deepspeed / srun / sbatch). Never imports torch."""
