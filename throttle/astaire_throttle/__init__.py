"""astaire-throttle: holds Astaire to ``astaire_cpu_limit_percentage``% of each CPU.

The limit is a cgroup cpu quota (cgroup v1 through cgroupspy, cgroup v2 written
directly) over the Astaire supervisor and all its workers; where no cgroup is
writable, a SIGSTOP/SIGCONT duty cycle holds the same share.
"""

__version__ = "0.1.0"
