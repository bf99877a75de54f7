"""The cluster as configured: the settings files, the vbucket view they give, and the
worklist (which vbuckets the local node must pull, and from whom)."""
