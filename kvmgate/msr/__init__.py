"""The pure MSR model: the kernel's filter and outcome rules, names, hardware bitmaps."""
