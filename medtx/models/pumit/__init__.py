"""PUMIT, the spacing-adaptive universal ViT (Luo et al.): its building blocks."""
