"""MTLoRA (Agiza, Neseem, Reda, CVPR 2024): placeholder, implemented in a following commit."""
