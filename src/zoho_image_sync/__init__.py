"""Mirror Zoho Inventory item images to disk."""

__version__ = "0.1.0"
