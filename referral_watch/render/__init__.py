"""PURE: the wording of every message: templates, channels' markup, i18n, reports, status views."""
