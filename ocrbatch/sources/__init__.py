"""Where pages come from: discovery (of folders and buckets), PDFs, images, video, and PDF text layers."""
