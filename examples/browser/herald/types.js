/** Public types of the herald browser client. */
export {};
