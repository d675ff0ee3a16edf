"""The maths behind the accountants: RDP, GDP and PRV analyses (numpy/scipy only, no torch)."""
