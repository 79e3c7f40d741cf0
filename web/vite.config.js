// The vault serves web/dist on its API port, so the built app uses relative asset
// paths and calls the API on its own origin (/api/v1). For `npm run dev`, the API is
// proxied to OSR_VAULT (default http://127.0.0.1:7480).
import { defineConfig } from 'vite';

export default defineConfig({
  base: './',
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2020',
    assetsInlineLimit: 0,
    chunkSizeWarningLimit: 200,
  },
  server: {
    proxy: {
      '/api': process.env.OSR_VAULT || 'http://127.0.0.1:7480',
    },
  },
});
