"""Who is calling and what they may hold: API keys with scopes (``keys``), owners of custom model
names (``owners``), per-principal and fleet-wide quotas (``quotas``) and the audit log (``audit``).
Kept in Redis so every gateway worker and job worker sees the same keys, owners and counts."""
