"""The egress report: what the egress guards counted, allowed or denied."""
